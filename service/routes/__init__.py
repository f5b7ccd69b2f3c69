"""One router per resource."""

from . import admin, decode, encode, health, models

ROUTERS = [encode.router, decode.router, models.router, admin.router, health.router]

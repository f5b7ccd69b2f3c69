"""`vqtok export`: a model directory's ONNX graphs (`graphs`), their parity with torch (`parity`), the
driver that writes them with the manifest (`driver.export_model`), and the compiled GPU runtime's graphs
(`compiled`). Nothing is imported here: `vqtok`'s command line imports `models.export.commands` without torch."""

"""Dataset tokenization: images in, parquet shards of token ids out, resumable after any interruption.

    vqtok tokenize --input photos/ --output out/      # the default model, resize crop, every column carried

Layout of an output folder (a parquet dataset as it is: `pq.read_table(out)`, `pd.read_parquet(out)`,
`pyarrow.dataset.dataset(out)` and `datasets.load_dataset("parquet", data_dir=out)` open it; the job
files sit in `__vqtok__/`, which pyarrow and `datasets` skip):
    part-00000.parquet ...   one row per image, sorted by index (schema below)
    __vqtok__/job.json       the job (input fingerprint, model, resize, carried columns, shard size) and
                             every committed shard with its row count, errors and sha256
    __vqtok__/errors.jsonl   one line per image not tokenized: index, key, reason, kind ("unreadable":
                             missing or undecodable; "refused": too large, or the wrong shape for
                             resize none), rebuilt from the job file
(Outputs begun before the `__vqtok__/` folder hold `manifest.json` and `errors.jsonl` at the top: they
are read, and moved into the folder when the job is resumed.)

Schema of a shard:
    key       string        the image's stable name: relative path, "file.parquet:row" or "shard.tar/sample"
    index     int64         its position in the input; shard k holds indices [k·S, (k+1)·S)
    tokens    list<int32>   token ids, row-major (grid_h · grid_w of them)
    grid_h    int32         token grid height and width: resolution/f each under resize crop
    grid_w    int32
    source_h  int32         the image's height and width before resizing (after EXIF orientation)
    source_w  int32
    sequence  list<int32>   with --layout/--vocab: the image as an LLM's id sequence (models.core.layouts)
    text_ids  list<int32>   with --text-tokenizer and --caption-column: the caption's ids
    input_ids list<int32>   text_ids then sequence, or sequence then text_ids (--order)
    ...                     the carried columns of the input, in the input's types: parquet columns other
                            than the image (`label` int64 stays int64); webdataset members and sidecar
                            files (`cat.jpg` + `cat.txt`) named by extension: `txt`/`json` as string,
                            `cls` as int64 (string where a value is not an integer), others binary; a
                            name taken by a column above is written `input_<name>`; null where missing
File metadata: `vqtok.model`, `vqtok.codebook_size`, `vqtok.downsample`, `vqtok.precision`,
`vqtok.resize`, `vqtok.manifest_sha256`, `vqtok.format`, `vqtok.shard` (with a layout, `vqtok.layout`
and `vqtok.sequences`: its ids and the job's LLM settings, as JSON); plus the input's schema
metadata that describes the carried columns (the `classes` names of a Hugging Face parquet; its
`datasets` features cut to the carried columns, so a ClassLabel keeps its names).
`load_tokens(out)` gives the rows back as numpy grids and columns (`TokenDataset`); `read_tokens(out)`
as one pyarrow Table. `--packed` adds `__packed__/input_ids.{bin,idx,json}`: every row's input_ids (or
sequence) as one little-endian uint32 stream with a Megatron-LM index (`sequences`; `read_packed(out)`).

Shard k holds source items [k·S, (k+1)·S) (see `models.core.sources`). A shard is committed by
renaming its file into place, then rewriting the manifest atomically; a re-run skips the shards the
manifest lists and redoes the rest. A kill at any moment therefore loses no image and duplicates
none, and a re-run writes byte-identical shards.

Floor plan, each module importing only those above it:
    format     the output format: schema, `Job`, `ModelSpec`, shard files (`ShardBuffer`,
               `commit_shard`), readers (`read_tokens`, `load_tokens`)
    sequences  the LLM columns (`SequenceOptions` -> `Sequencer`: a layout, a text tokenizer) and the packed form
    job        the job flow, written once: `plan`, `JobManifest`, `JobRun` (pending shards, per-shard
               buffers and commits, errors file), `Summary`
    decoding   reading and decoding images in worker threads or processes (`prepare_item`, `prepared_stream`)
    encoders   `PixelEncoder` / `FileEncoder`; `RuntimeEncoder` (in-process), `ServerEncoder` (a running
               service, fed the stored files); `encode_batch`
    local      engine: `tokenize_local`, decoding here, encoding with either encoder
    ray        engine: `tokenize_ray`, the same flow on Ray Data
    commands   `vqtok tokenize`
The engines differ only in how rows are produced; both drive a `JobRun`.

Nothing is imported here: `vqtok` imports `clients.tokenize.commands` for every command and must not pay
for numpy and pyarrow before `tokenize` runs. The public names are `vqtok`'s.
"""

"""Training data: rows from files, hub datasets or the embedded corpus, turned into token
examples whose labels cover only what the model should learn to say.

The modules, in the order the data flows through them:

    sources     where rows come from (files, a hub dataset or a folder laid out like one,
                the embedded corpus), read one at a time
    normalise   one row checked and normalised to messages (or plain text)
    encode      chat template + tokenisation, labels = IGNORE_INDEX outside the answers
    fit         truncation and packing to seq_len
    order       the seeded eval split and the order of each epoch (exact resume)
    pipeline    prepare_data: all of the above as batched, parallel maps over Arrow tables
    cache       prepared data on disk, keyed by everything that decides it
    batches     examples read by index from the memory-mapped tables; collate
    rows        load_rows: one source's rows as a Python list (small data, tools)
"""

from l1ra_lite.data.batches import Examples, collate
from l1ra_lite.data.cache import default_data_cache
from l1ra_lite.data.common import IGNORE_INDEX, BadRow, DataSplits, DataStats
from l1ra_lite.data.encode import encode_rows, leading_bos_id, render_chat
from l1ra_lite.data.fit import Packer, has_answer, pack, truncate
from l1ra_lite.data.normalise import normalise_row
from l1ra_lite.data.order import epoch_order, eval_row_count, split_rows
from l1ra_lite.data.pipeline import default_num_proc, prepare_data
from l1ra_lite.data.rows import load_rows
from l1ra_lite.data.sources import EMBEDDED_NAME, FILE_KINDS

__all__ = [
    "EMBEDDED_NAME",
    "FILE_KINDS",
    "IGNORE_INDEX",
    "BadRow",
    "DataSplits",
    "DataStats",
    "Examples",
    "Packer",
    "collate",
    "default_data_cache",
    "default_num_proc",
    "encode_rows",
    "epoch_order",
    "eval_row_count",
    "has_answer",
    "leading_bos_id",
    "load_rows",
    "normalise_row",
    "pack",
    "prepare_data",
    "render_chat",
    "split_rows",
    "truncate",
]

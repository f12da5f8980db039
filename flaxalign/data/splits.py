"""The train and eval records of a stage's data config block: read in its format, eval held out when not given."""

from flaxalign.data import formats
from flaxalign.data.loader import split_every_kth
from flaxalign.data.sources import read_records


def read_splits(data_cfg, kind):
    """{"train": (spec, records), "eval": (spec, records)} of a data config block: `train`, `eval` (record
    specs; "" = hold out `eval_fraction` of train: per label for `kto`), `max_examples` (0 = all) and
    `format` / `columns` (`flaxalign.data.formats`)."""
    record_format = formats.from_config(data_cfg)
    train_records = read_records(data_cfg.train, kind, record_format=record_format)
    if data_cfg.eval:
        eval_spec, eval_records = data_cfg.eval, read_records(data_cfg.eval, kind, record_format=record_format)
    else:
        hold_out = hold_out_by_label if kind == "kto" else split_every_kth
        train_records, eval_records = hold_out(train_records, float(data_cfg.eval_fraction), data_cfg.train)
        eval_spec = data_cfg.train
    if data_cfg.max_examples:
        train_records = train_records[: int(data_cfg.max_examples)]
    return {"train": (data_cfg.train, train_records), "eval": (eval_spec, eval_records)}


def hold_out_by_label(records, eval_fraction, spec):
    """`split_every_kth` within the desirable and within the undesirable records, keeping dataset order.

    Unpaired data often alternates labels (`unpair_preferences`), and every k-th record of an alternating list
    with an even k has a single label; holding out per label keeps both in eval.
    """
    groups = [[index for index, record in enumerate(records) if record["label"] is label] for label in (True, False)]
    if min(len(group) for group in groups) < 2:
        return split_every_kth(records, eval_fraction, spec)
    held_out = set()
    for group in groups:
        held_out.update(split_every_kth(group, eval_fraction, spec)[1])
    return ([record for index, record in enumerate(records) if index not in held_out],
            [record for index, record in enumerate(records) if index in held_out])

"""The train and eval records of a stage's data config block: read in its format, eval held out when not given."""

from flaxalign.data import formats
from flaxalign.data.loader import split_every_kth
from flaxalign.data.sources import read_records


def read_splits(data_cfg, kind):
    """{"train": (spec, records), "eval": (spec, records)} of a data config block: `train`, `eval` (record
    specs; "" = hold out `eval_fraction` of train: per label for `kto`), `mix` (optional: more record specs,
    comma-separated, in TRL's layout: a data mixture, each source interleaved with train's in proportion to its size,
    and held out on its own when `eval` is ""), `max_examples` (0 = all, a prefix of the mixture) and `format` /
    `columns` (`flaxalign.data.formats`)."""
    record_format = formats.from_config(data_cfg)
    sources = [(data_cfg.train, read_records(data_cfg.train, kind, record_format=record_format))]
    sources += [(spec, read_records(spec, kind)) for spec in
                (s.strip() for s in str(getattr(data_cfg, "mix", "")).split(",")) if spec]
    if data_cfg.eval:
        eval_spec, eval_records = data_cfg.eval, read_records(data_cfg.eval, kind, record_format=record_format)
        train_records = interleave([records for _, records in sources])
    else:
        # each source on its own: every k-th record of an interleaved list could miss a source altogether
        hold_out = hold_out_by_label if kind == "kto" else split_every_kth
        parts = [hold_out(records, float(data_cfg.eval_fraction), spec) for spec, records in sources]
        train_records, eval_records = (interleave([part[i] for part in parts]) for i in (0, 1))
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


def interleave(sources: list[list]) -> list:
    """The records of every source in one list, each source spread evenly over it in its own order: record i of a
    source of n sits at relative position (i + ½) / n (ties: the earlier source first), so every prefix and every
    k-th record hold each source in proportion to its size."""
    keyed = [((i + 0.5) / len(records), s, i) for s, records in enumerate(sources) for i in range(len(records))]
    return [sources[s][i] for _, s, i in sorted(keyed)]

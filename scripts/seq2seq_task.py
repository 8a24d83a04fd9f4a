"""The synthetic seq2seq task of the encoder-decoder demonstration: rewrite dates written in eight
everyday formats into ISO 8601.

    python scripts/seq2seq_task.py --out data/dates [--train 60000 --test 2000 --seed 0]

writes OUT/train.tsv and OUT/test.tsv, one `source<TAB>target` pair per line, for example

    Thursday, March 7, 2024      2024-03-07
    7.3.1987                     1987-03-07
    Sep 30, 2051                 2051-09-30

Dates run over 1900-01-01 .. 2099-12-31 (73,049 days). The test dates are held out: no test date
appears in train.tsv in any format, so a model can only score by learning the rewriting, not by
remembering pairs. The weekday in the long format is the real one (it carries no information the
model needs, and must be dropped).
"""
from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import numpy as np

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FIRST, LAST = dt.date(1900, 1, 1), dt.date(2099, 12, 31)


def render(d: dt.date, fmt: int) -> str:
    m, a = MONTHS[d.month - 1], MONTHS[d.month - 1][:3]
    return [
        f"{m} {d.day}, {d.year}",                                   # March 7, 2024
        f"{d.day} {m} {d.year}",                                    # 7 March 2024
        f"{a} {d.day}, {d.year}",                                   # Mar 7, 2024
        f"{d.day} {a} {d.year}",                                    # 7 Mar 2024
        f"{d.month}/{d.day}/{d.year}",                              # 3/7/2024 (US order)
        f"{d.day}.{d.month}.{d.year}",                              # 7.3.2024 (European order)
        f"{d.year}.{d.month:02d}.{d.day:02d}",                      # 2024.03.07
        f"{DAYS[d.weekday()]}, {m} {d.day}, {d.year}",              # Thursday, March 7, 2024
    ][fmt]


N_FORMATS = 8


def make_pairs(n_train: int, n_test: int, seed: int):
    days = (LAST - FIRST).days + 1
    rng = np.random.Generator(np.random.PCG64(seed))
    order = rng.permutation(days)
    test_days, train_days = order[:n_test], order[n_test:]
    test = [(render(FIRST + dt.timedelta(int(k)), i % N_FORMATS), (FIRST + dt.timedelta(int(k))).isoformat())
            for i, k in enumerate(test_days)]
    picks = rng.choice(train_days, size=n_train, replace=n_train > train_days.size)
    fmts = rng.integers(0, N_FORMATS, size=n_train)
    train = [(render(FIRST + dt.timedelta(int(k)), int(f)), (FIRST + dt.timedelta(int(k))).isoformat())
             for k, f in zip(picks, fmts)]
    return train, test


def write_tsv(path: Path, pairs):
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--train", type=int, default=60000, help="training pairs")
    ap.add_argument("--test", type=int, default=2000, help="held-out pairs (dates never seen in training)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.train < 1 or a.test < 1:
        ap.error("--train and --test must be positive")
    train, test = make_pairs(a.train, a.test, a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    write_tsv(a.out / "train.tsv", train)
    write_tsv(a.out / "test.tsv", test)
    print(f"{a.out / 'train.tsv'}: {len(train)} pairs; {a.out / 'test.tsv'}: {len(test)} pairs (held-out dates)")


if __name__ == "__main__":
    main()

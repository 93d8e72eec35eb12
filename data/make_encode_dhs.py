"""Rebuild data/encode_dhs_200bp.tsv.gz from the text file shipped in the PyPI wheel dnadiffusion==0.0.0.dev0.

    pip install --no-deps dnadiffusion==0.0.0.dev0
    python data/make_encode_dhs.py            # writes data/encode_dhs_200bp.tsv.gz

Keeps the columns train_dna.py needs (chrom, summit, cell_type, signal, split, sequence; the
sequence is the hg38 200 bp around the DHS summit), shortens the
cell-type tags (HepG2_ENCLB029COU -> HepG2) and renames the split labels (training -> train). The gzip
header carries no timestamp, so the output is byte-for-byte reproducible.
"""
import csv
import gzip
import importlib.util
import io
import os
import sys

SRC = "K562_hESCT0_HepG2_GM12878_12k_sequences_per_group.txt"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "encode_dhs_200bp.tsv.gz")
SPLIT = {"training": "train", "validation": "validation", "test": "test"}


def main(src: str | None = None, out: str = OUT) -> None:
    if src is None:
        spec = importlib.util.find_spec("dnadiffusion")
        if spec is None:
            sys.exit("install the source first: pip install --no-deps dnadiffusion==0.0.0.dev0")
        src = os.path.join(os.path.dirname(spec.origin), "data", SRC)
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(["chrom", "summit", "cell_type", "signal", "split", "sequence"])
    with open(src, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            w.writerow([row["chr"], row["summit"], row["TAG"].split("_")[0], row["total_signal"],
                        SPLIT[row["data_label"]], row["sequence"].upper()])
    with open(out, "wb") as raw:  # no timestamp, no file name: the same bytes on every rebuild
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
            gz.write(buf.getvalue().encode())
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main(*sys.argv[1:2])

"""Writes the calibration part of WikiText-2 (the articles ``kakeya eval`` never scores) to
a text file, for held-out checks of choices made on evaluation passages:

    python reports/basis/calibration_text.py /tmp/wikitext2_calibration_part.txt
    kakeya sweep --text-file /tmp/wikitext2_calibration_part.txt --methods ... --passages 16
"""

import sys

from kakeya_py.eval.corpus import load_wikitext

articles = load_wikitext(allow_download=False).part("calibration")
with open(sys.argv[1], "w", encoding="utf-8") as f:
    f.write("\n".join(a.text for a in articles))
print(f"{len(articles)} calibration articles -> {sys.argv[1]}")

"""imglish ingest of a Parquet image table (HF-datasets style binary column): every row accepted, and off a
terminal the progress line gives the table's row count as the phase's total."""

import io
import os
import subprocess
import unittest

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from common import imglish_bin, tmpdir


class IngestParquetTest(unittest.TestCase):
    def test_rows_are_the_phase_total(self):
        d = tmpdir(self)
        images = []
        for i in range(7):
            buf = io.BytesIO()
            Image.new("RGB", (40, 40), (30 * i, 100, 200 - 20 * i)).save(buf, format="PNG")
            images.append(buf.getvalue())
        table = pa.table({"image": pa.array(images, type=pa.binary()), "caption": [f"shade {i}" for i in range(7)]})
        pq.write_table(table, os.path.join(d, "t.parquet"))
        r = subprocess.run(
            [imglish_bin(), "ingest", "--images", "t.parquet", "--caption-column", "caption", "--out", "m"],
            cwd=d, capture_output=True, text=True, timeout=300, env=dict(os.environ, IMGLISH_PROGRESS_SECS="0.001"))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("progress: ingesting t.parquet: 0/7 (", r.stderr)
        rows = pq.read_table(os.path.join(d, "m", "samples.parquet")).num_rows
        self.assertEqual(rows, 7)


if __name__ == "__main__":
    unittest.main()

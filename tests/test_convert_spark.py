"""docs/SPARK.md's mapInPandas recipe, executed verbatim on a local[2] Spark session: the merged
dataset equals a single-process ShardWriter conversion of the same rows."""

from __future__ import annotations

import os
import re
import shutil
import sys

import numpy as np
import pytest

from streamshard import ShardWriter, open_dataset

pyspark = pytest.importorskip("pyspark")
pytestmark = pytest.mark.slow(reason="starts a local[2] Spark session (JVM): ~25 s setup, ~35 s run here")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("pyspark needs Java (17+)", allow_module_level=True)

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "SPARK.md")
COLUMNS = {"id": "int64", "text": "str", "tokens": "int32[]", "meta": "json"}


def recipe() -> dict:
    """Execute the first ```python block of docs/SPARK.md and return its namespace."""
    text = open(DOC, encoding="utf-8").read()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, DOC, "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (SparkSession.builder.master("local[2]").appName("streamshard-test")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2")
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               # A 200-row job: the JVM's C1 compiler alone and no whole-stage code generation
               # spend less CPU warming up than they would save (~20 s less on 2 busy cores).
               .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
               .config("spark.sql.codegen.wholeStage", "false")
               .config("spark.sql.adaptive.enabled", "false").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def test_recipe_equals_single_process_conversion(spark, tmp_path):
    rows = [{"id": i, "text": f"line {i} \u00e9", "tokens": list(range(i % 7)),
             "meta": {"k": str(i)}} for i in range(200)]
    df = spark.createDataFrame(
        [(r["id"], r["text"], r["tokens"], r["meta"]) for r in rows],
        "id long, text string, tokens array<int>, meta map<string,string>").repartition(4, "id")
    df = df.sortWithinPartitions("id")
    write = recipe()["write_streamshard_spark"]
    dest = str(tmp_path / "spark")
    index = write(df, dest, COLUMNS, shard_size="2KB", block_size="1KB")
    # the single-process reference: the same rows in the DataFrame's partition order
    ordered = [r.asDict() for r in df.collect()]
    with ShardWriter(str(tmp_path / "single"), columns=COLUMNS) as w:
        for r in ordered:
            w.write({"id": r["id"], "text": r["text"], "meta": dict(r["meta"]),
                     "tokens": np.asarray(r["tokens"], np.int32)})
    got, ref = open_dataset(dest), open_dataset(str(tmp_path / "single"))
    assert index.num_samples == len(got) == len(ref) == 200
    for i in range(200):
        a, b = got[i], ref[i]
        assert a["id"] == b["id"] and a["text"] == b["text"] and a["meta"] == b["meta"]
        assert a["tokens"].dtype == np.int32 and np.array_equal(a["tokens"], b["tokens"])
    assert sorted(r["id"] for r in rows) == sorted(got[i]["id"] for i in range(200))
    assert all(s.file.startswith("parts/part-") for s in got.index.shards)

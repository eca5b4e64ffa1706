"""What makes a result file complete: ours, for this model, threshold setting and input content."""
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from gradcon_core.results.files import (
    ResultFile,
    input_identity,
    is_complete,
    recorded_identity,
    result_identity,
    result_name,
)
from gradcon_core.results.table import SCHEMA


def test_a_result_is_complete_only_for_its_model_threshold_and_input(tmp_path):
    fs = pafs.LocalFileSystem()
    source = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "image": [b"1", b"2"]}), source)
    identity = result_identity("m1", 0.5, None, input_identity(fs, str(source)))
    out = str(tmp_path / "out.parquet")
    assert not is_complete(fs, out, 2, identity)  # absent
    result = ResultFile(fs, out, identity)
    result.write(pa.table({name: pa.nulls(2, field.type) for name, field in zip(SCHEMA.names, SCHEMA)})
                 .set_column(0, "id", pa.array(["a", "b"])))
    result.close()
    assert is_complete(fs, out, 2, identity)
    assert not is_complete(fs, out, 3, identity)  # another row count
    assert not is_complete(fs, out, 2, {**identity, "model_id": "m2"})
    assert not is_complete(fs, out, 2, {**identity, "threshold": 0.0})
    assert not is_complete(fs, out, 2, {**identity, "threshold": None, "contamination": 0.1})
    pq.write_table(pa.table({"id": ["a", "c"], "image": [b"1", b"2"]}), source)  # same name and rows, new content
    assert not is_complete(fs, out, 2, result_identity("m1", 0.5, None, input_identity(fs, str(source))))
    (tmp_path / "foreign.parquet").write_bytes(b"not parquet at all")
    for foreign in (str(tmp_path / "foreign.parquet"), str(source)):  # not parquet; parquet but not ours
        with pytest.raises(ValueError, match="not a gradcon result file"):
            is_complete(fs, foreign, 2, identity)
    with pytest.raises(ValueError, match="not a parquet file"):
        input_identity(fs, str(tmp_path / "foreign.parquet"))


def test_result_files_are_named_after_their_input_and_row_group_in_row_order():
    assert result_name("/in/part-00003.parquet", 0, 1) == "part-00003.parquet"
    names = [result_name("s3://b/in/part-00003.parquet", g, 12) for g in range(12)]
    assert names[0] == "part-00003-rg00000.parquet" and names == sorted(names)
    assert result_name("/in/x.parq", 2, 3) == "x.parq-rg00002.parquet"


def test_a_result_file_records_its_row_group_and_numbers_id_less_rows_from_the_groups_first_row(tmp_path):
    fs = pafs.LocalFileSystem()
    source = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"image": [b"1", b"2", b"3"]}), source)
    identity = result_identity("m", 0.5, None, input_identity(fs, str(source)), group=4)
    out = str(tmp_path / "out.parquet")
    result = ResultFile(fs, out, identity, first_row=100)
    result.write(pa.table({name: pa.nulls(3, field.type) for name, field in zip(SCHEMA.names, SCHEMA)}))
    assert not (tmp_path / "out.parquet").exists()  # only once complete
    result.close()
    assert pq.read_table(out).column("id").to_pylist() == [f"part-0.parquet:{i}" for i in (100, 101, 102)]
    assert recorded_identity(fs, out) == (identity, 3) and is_complete(fs, out, 3, identity)
    assert not is_complete(fs, out, 3, {**identity, "row_group": 5})

"""What makes a result file complete: ours, for this model, threshold setting and input content."""
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from gradcon_core.results.files import (
    PARTS,
    ROW,
    ResultFile,
    clear_pieces,
    input_identity,
    is_complete,
    join_pieces,
    remove_parts_folder,
    result_identity,
    write_piece,
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


def _rows(numbers: list[int]) -> pa.Table:
    """Result rows (SCHEMA, nulls but the id) numbered `numbers`, ids left null for the join to fill."""
    table = pa.table({name: pa.nulls(len(numbers), field.type) for name, field in zip(SCHEMA.names, SCHEMA)})
    return table.append_column(ROW, pa.array(numbers, pa.int64()))


def test_pieces_written_in_any_order_join_into_one_file_in_row_order(tmp_path):
    fs, out = pafs.LocalFileSystem(), str(tmp_path / "out")
    identity = {"model_id": "m", "threshold": 0.5, "contamination": None, "input": {"name": "part-0.parquet"}}
    # Two actors' batches: rows 5-7 and 0-1 in one (out of order, two runs), 2-4 in the other.
    write_piece(fs, out, "part-0.parquet", _rows([6, 0, 5, 7, 1]))
    write_piece(fs, out, "part-0.parquet", _rows([2, 3, 4]))
    assert sorted(p.name for p in (tmp_path / "out" / PARTS / "part-0.parquet").iterdir()) == [
        "000000000000.parquet", "000000000002.parquet", "000000000005.parquet"]
    join_pieces(fs, out, f"{out}/part-0.parquet", identity, rows=8)
    joined = pq.read_table(f"{out}/part-0.parquet")
    assert joined.column("id").to_pylist() == [f"part-0.parquet:{i}" for i in range(8)]  # the ids of id-less rows
    assert is_complete(fs, f"{out}/part-0.parquet", 8, identity)
    remove_parts_folder(fs, out)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["part-0.parquet"]


def test_a_missing_piece_is_an_error_and_no_result_file(tmp_path):
    fs, out = pafs.LocalFileSystem(), str(tmp_path / "out")
    identity = {"model_id": "m", "threshold": 0.5, "contamination": None, "input": {"name": "a.parquet"}}
    write_piece(fs, out, "a.parquet", _rows([0, 1, 4]))  # rows 2-3 never scored
    with pytest.raises(RuntimeError, match=r"row 4 after 2 of 5\): run the same command again"):
        join_pieces(fs, out, f"{out}/a.parquet", identity, rows=5)
    write_piece(fs, out, "a.parquet", _rows([2, 3]))
    with pytest.raises(RuntimeError, match="5 of 6 rows of a.parquet were scored"):
        join_pieces(fs, out, f"{out}/a.parquet", identity, rows=6)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith("a.parquet")]  # nor a .partial
    clear_pieces(fs, out, "a.parquet")  # a re-run starts the input again
    assert not (tmp_path / "out" / PARTS / "a.parquet").exists()

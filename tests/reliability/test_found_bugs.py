"""One regression test per bug the fuzz suite found, each fixed in its own commit.

Every case here once escaped as something other than a UserError (an internal error, exit code 1,
a traceback for the person) or named no file.
"""

from __future__ import annotations

import pytest

from qlora_studio import formats
from qlora_studio.errors import DataError

from .fuzzkit import check_user_error


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_an_integer_too_long_for_python_is_a_data_error(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_text('{"instruction": "q", "output": ' + "9" * 5000 + "}\n")
    with pytest.raises(DataError, match="more than 4300 digits") as info:
        formats.read_local(path)
    check_user_error(info.value)
    assert info.value.where == (f"{path}, line 1" if suffix == ".jsonl" else str(path))

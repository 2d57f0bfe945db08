"""Every case of the bad-input corpus (tests/badinputs): a clear error naming the file or key, or, for a
valid input, acceptance."""
import re

import pytest

from tests.badinputs import ACCEPTED, load_all

CASES = load_all()


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, tmp_path):
    case = CASES[name]
    if case.match == ACCEPTED:
        case.run(tmp_path)
        return
    with pytest.raises(case.error) as info:
        case.run(tmp_path)
    message = str(info.value)
    assert re.search(case.match, message), f"{name}: message does not match {case.match!r}:\n{message}"
    for n in case.names:
        expected = n.format(tmp=tmp_path)
        assert expected in message, f"{name}: message does not name {expected!r}:\n{message}"


def test_corpus_is_not_empty():
    assert len(CASES) >= 1

"""The range table of experiments/config_checks.py, probed key by key through load_config: a value just
outside each bound is refused naming the key, a closed bound itself is accepted, and every pattern of
the table names keys that exist (a typo there would check nothing)."""
import math
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.config import load_config
from experiments.config_checks import RANGES, Interval, key_matches, leaves, parse_interval

BASE = OmegaConf.to_container(load_config([]), resolve=True)
REPO = Path(__file__).resolve().parents[1]


def concrete(pattern: str) -> str:
    """The first key of the default config that `pattern` names."""
    return next(k for k, v in leaves(BASE) if key_matches(pattern, k) and v is not None)


def override(key: str, x: float) -> str:
    """`key=x`, as a list of x where the default is a list (every element set)."""
    default = dict(leaves(BASE))[key]
    text = repr(int(x)) if float(x).is_integer() and abs(x) < 1e18 else repr(x)
    return f"{key}=[{','.join([text] * len(default))}]" if isinstance(default, list) else f"{key}={text}"


def outside(iv: Interval) -> list[float]:
    out = [iv.lo - 1 if iv.lo_closed else iv.lo]
    if math.isfinite(iv.hi):
        out.append(iv.hi + 1 if iv.hi_closed else iv.hi)
    return out


def bounds_inside(iv: Interval) -> list[float]:
    return [b for b, closed in ((iv.lo, iv.lo_closed), (iv.hi, iv.hi_closed)) if closed and math.isfinite(b)]


def test_every_pattern_names_existing_keys():
    for pattern in RANGES:
        assert any(key_matches(pattern, k) for k, _ in leaves(BASE)), f"RANGES key {pattern!r} matches nothing"


@pytest.mark.parametrize("pattern", sorted(RANGES))
def test_out_of_range_is_refused_naming_the_key(pattern):
    key, iv = concrete(pattern), parse_interval(RANGES[pattern])
    for x in outside(iv):
        with pytest.raises(ValueError, match=re.escape(key) + r"=.*" + re.escape(iv.text)):
            load_config([override(key, x)])
    for x in bounds_inside(iv):
        assert dict(leaves(OmegaConf.to_container(load_config([override(key, x)]))))[key] is not None


def test_interval_notation():
    iv = parse_interval("(0, 1]")
    assert 1 in iv and 0 not in iv and 0.5 in iv and float("nan") not in iv
    assert float("inf") not in parse_interval("(0, inf)")
    with pytest.raises(ValueError, match="not an interval"):
        parse_interval("0..1")


def test_key_patterns_match_one_segment():
    assert key_matches("methods.*.p", "methods.bigaug.p")
    assert not key_matches("methods.*.p", "methods.bigaug.search.p")


def test_yaml_is_only_safe_loaded():
    """No yaml.load without a safe loader anywhere in the product (a YAML tag must never run code)."""
    unsafe = re.compile(r"yaml\.(unsafe_load|load_all|full_load)\(|yaml\.load\((?![^)]*SafeLoader)|Loader=yaml\.(Unsafe|Full)?Loader\b")
    hits = [f"{p.relative_to(REPO)}:{i}" for p in REPO.rglob("*.py") if ".venv" not in p.parts and "tests" not in p.parts
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if unsafe.search(line)]
    assert not hits, hits

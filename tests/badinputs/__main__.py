"""`python -m tests.badinputs`: the corpus counted per kind (for the README's Reliability section)."""
from collections import Counter

from tests.badinputs import ACCEPTED, load_all

cases = load_all()
by_kind = Counter(c.kind for c in cases.values())
accepted = Counter(c.kind for c in cases.values() if c.match == ACCEPTED)
for kind in sorted(by_kind):
    print(f"{kind:<10} {by_kind[kind]:>4} cases ({accepted[kind]} valid inputs that must be accepted)")
print(f"{'total':<10} {len(cases):>4} cases ({sum(accepted.values())} accepted)")

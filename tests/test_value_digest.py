"""Value digests must be equal in any kernel process and for a value's restored copy, or a
step would execute again after a restart with 'input changed'."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import cloudpickle
import numpy as np
import pandas as pd

from durable_nb.state.fingerprint import value_digest
from durable_nb.records import is_opaque

NOTEBOOK_CODE = """
def scale(values, factor=2):
    allowed = {'alpha', 'beta', 'gamma', 'delta'}
    return [v * factor for v in values if v in allowed]

class Box:
    def __init__(self):
        self.tags = {'red', 'green', 'blue', 'cyan', 'magenta'}
        self.frame = __import__('pandas').DataFrame({'a': [1.0, 2.0], 'b': ['x', 'y']})

value = {'tags': {'one', 'two', 'three', 'four'}, 'scale': scale, 'box': Box(),
         'array': __import__('numpy').arange(10.0)[::2], 'nested': [frozenset({'p', 'q', 'r'})]}
"""


def digest_in_a_new_process(hash_seed: str) -> str:
    script = ("import sys\nfrom durable_nb.state.fingerprint import value_digest\n"
              f"exec({NOTEBOOK_CODE!r}, sys.modules['__main__'].__dict__)\n"
              "print(value_digest(value))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYTHONHASHSEED": hash_seed}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_digest_is_the_same_in_every_process_despite_string_hashing() -> None:
    digests = {digest_in_a_new_process(seed) for seed in ("1", "2", "3", "4")}
    assert len(digests) == 1


def test_digest_of_a_restored_copy_equals_the_original() -> None:
    value = {"frame": pd.DataFrame({"a": np.arange(5.0), "b": list("abcde")}),
             "series": pd.Series([1.0, 2.0], name="s"), "view": np.arange(20.0)[::3],
             "masked": np.ma.masked_array([1, 2, 3], mask=[0, 1, 0])}
    restored = pickle.loads(cloudpickle.dumps(value, protocol=5))
    assert value_digest(restored) == value_digest(value)


def test_digest_changes_when_content_changes_in_place() -> None:
    array = np.zeros(1000)
    before = value_digest(array)
    array[500] = 1.0
    assert value_digest(array) != before


def test_unpicklable_value_is_fingerprinted_by_type() -> None:
    import threading

    digest = value_digest(threading.Lock())
    assert is_opaque(digest) and "lock" in digest.lower()


def test_an_array_shared_by_many_objects_is_hashed_once() -> None:
    from durable_nb.state.fingerprint import sized_digest

    weights = np.ones(100_000)
    models = [{"weights": weights, "id": index} for index in range(50)]
    _, hashed = sized_digest(models)
    assert hashed < 2 * weights.nbytes
    copy = pickle.loads(cloudpickle.dumps(models, protocol=5))
    assert value_digest(copy) == value_digest(models)


def test_a_matplotlib_histogram_digests_the_same_in_every_process() -> None:
    # Its transform tree keeps `{id(parent): parent}` dicts: addresses differ per process.
    script = ("import matplotlib\nmatplotlib.use('agg')\nimport matplotlib.pyplot as plt\n"
              "import numpy as np\nfrom durable_nb.state.fingerprint import value_digest\n"
              "fig, ax = plt.subplots()\nhist = ax.hist(np.arange(20.0) % 7)\n"
              "print(value_digest(hist), value_digest(fig))")
    digests = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              check=True, timeout=120).stdout for _ in range(2)}
    assert len(digests) == 1


def test_a_dict_keyed_by_its_values_addresses_counts_by_its_values() -> None:
    first, second = [1], [1]
    assert value_digest({id(first): first}) == value_digest({id(second): second})
    assert value_digest({id(first): first}) != value_digest({id(first): [2]})
    assert value_digest({1: first}) != value_digest({2: first})  # other int keys still count


def test_digesting_a_matplotlib_artist_does_not_change_its_digest() -> None:
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots()
    try:
        bars = axes.bar([1, 2], [3, 4])
        # Pickling a CallbackRegistry advances its id counter: a digest must not see that.
        assert value_digest(bars) == value_digest(bars)
    finally:
        plt.close(figure)


def test_datetimes_are_digested_by_content_and_unit() -> None:
    frame = pd.DataFrame({"day": pd.date_range("2024-01-01", periods=3), "units": [1, 2, 3]})
    assert not is_opaque(value_digest(frame))
    assert value_digest(frame) == value_digest(pickle.loads(cloudpickle.dumps(frame)))
    days = np.array(["2024-01-01"], dtype="M8[D]")
    assert value_digest(days) != value_digest(days.astype("M8[s]"))


def test_a_frame_digests_as_its_copy_and_its_restored_copy_and_sees_each_change() -> None:
    frame = pd.DataFrame({"day": pd.date_range("2024-01-01", periods=3), "units": [1, 2, 3],
                          "city": ["Lyon", "Lille", "Nice"]}).set_index("day")
    same = {value_digest(frame), value_digest(frame.copy()),
            value_digest(pickle.loads(cloudpickle.dumps(frame)))}
    assert len(same) == 1
    changed = [frame.copy() for _ in range(4)]
    changed[0].loc[changed[0].index[1], "units"] = 5
    changed[1].loc[changed[1].index[1], "city"] = "Metz"
    changed[2] = changed[2].rename(columns={"units": "count"})
    changed[3].index = changed[3].index + pd.Timedelta(days=1)
    assert len({value_digest(other) for other in changed} | same) == 5


def test_a_regex_match_counts_by_what_it_matched() -> None:
    import re

    first = re.search(r"(\d+)", "ab 12 34")
    assert value_digest(first) == value_digest(re.compile(r"(\d+)").search("ab 12 34"))
    assert value_digest(first) != value_digest(re.search(r"(\d+)", "ab 12 34", re.ASCII))
    assert value_digest(first) != value_digest(list(re.finditer(r"(\d+)", "ab 12 34"))[1])
    assert not is_opaque(value_digest(first))


def test_pandas_indexes_and_arrays_count_by_value_not_by_their_caches() -> None:
    # Any use of a pandas index or array (a repr, `.dtype`) fills its `_cache`, which its
    # pickle carries: a digest of the pickle changed with no change to the value, so a step
    # that read one counted as changing it, and a replayed copy differed from the original.
    made = [pd.array([1, None, 3], dtype="Int64"),
            pd.date_range("2024-01-01", periods=3, freq="h", tz="Europe/Berlin"),
            pd.Categorical(["a", "b", "a"], categories=["b", "a"], ordered=True),
            pd.MultiIndex.from_product([["x", "y"], [1, 2]], names=["k", "n"]),
            pd.period_range("2024Q1", periods=2, freq="Q"), pd.interval_range(0, 3),
            pd.arrays.SparseArray([0, 0, 1, 0]), pd.array(["a", None], dtype="string")]
    for value in made:
        fresh = value_digest(value)
        repr(value), str(value), value.dtype  # noqa: B018 - fills the caches
        assert value_digest(value) == fresh == value_digest(pickle.loads(pickle.dumps(value))), \
            type(value).__name__

    differing = [
        (pd.Categorical(["a", "b"], categories=["b", "a"], ordered=True),
         pd.Categorical(["a", "b"], categories=["a", "b"], ordered=True)),
        (pd.date_range("2024-01-01", periods=3, freq="h", tz="UTC"),
         pd.date_range("2024-01-01", periods=3, freq="h", tz="Europe/Berlin")),
        (pd.date_range("2024-01-01", periods=3, freq="h"),
         pd.DatetimeIndex(pd.date_range("2024-01-01", periods=3, freq="h"), freq=None)),
        (pd.Index([1, 2], name="a"), pd.Index([1, 2], name="b")),
        (pd.array([1, None], dtype="Int64"), pd.array([1, 2], dtype="Int64")),
    ]
    for first, second in differing:
        assert value_digest(first) != value_digest(second), (first, second)


def test_a_cached_notebook_function_counts_by_its_code() -> None:
    namespace: dict[str, object] = {"__name__": "__main__"}
    exec("import functools\n@functools.lru_cache\ndef f(x):\n    return x + 1", namespace)  # noqa: S102
    first = value_digest(namespace["f"])
    exec("import functools\n@functools.lru_cache\ndef f(x):\n    return x + 2", namespace)  # noqa: S102
    assert value_digest(namespace["f"]) != first
    exec("import functools\n@functools.lru_cache\ndef f(x):\n    return x + 1", namespace)  # noqa: S102
    assert value_digest(namespace["f"]) == first


def test_a_singledispatch_function_counts_by_its_implementations() -> None:
    def made(body: str) -> object:
        namespace: dict[str, object] = {"__name__": "__main__"}
        exec("import functools\n@functools.singledispatch\ndef f(x):\n    return 0\n"  # noqa: S102
             f"@f.register\ndef _(x: int):\n    return {body}", namespace)
        return namespace["f"]

    assert value_digest(made("1")) == value_digest(made("1"))
    assert value_digest(made("1")) != value_digest(made("2"))


def test_an_abstract_notebook_class_counts_by_its_attributes() -> None:
    namespace: dict[str, object] = {"__name__": "__main__"}
    exec("import abc\nclass Base(abc.ABC):\n    registry = []", namespace)  # noqa: S102
    base = namespace["Base"]
    first = value_digest(base)
    assert not is_opaque(first)
    base.registry.append("Square")  # type: ignore[attr-defined]
    assert value_digest(base) != first

"""``import peer_ll.data`` loads neither Avalanche nor HF datasets; names load on use."""

import subprocess
import sys


def test_package_import_is_lazy():
    code = (
        "import sys, peer_ll.data as d; "
        "print('avalanche' in sys.modules, 'datasets' in sys.modules); "
        "d.TextDomainBenchmark; print('avalanche' in sys.modules); "
        "print(d.streams.make_stream is d.make_stream)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "False", "True", "True"]


def test_unknown_names_raise_attribute_error():
    import pytest

    import peer_ll.data as d

    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        getattr(d, "nope")  # noqa: B009
    assert "text_domain_stream" in dir(d) and "text_domain_stream" in d.__all__

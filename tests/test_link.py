"""Link emulation (tidal.backends.link): the targets' arithmetic against the published figures, bad values, an
emulated copy's lower bound on the CPU backend, and the option reaching the backend from Engine, offload and
Runtime. The CLI's --link is tested with the commands (test_profile, test_compare, test_study)."""
import math
import time

import pytest
import torch

import tidal
from hf_models import make_model
from tidal.backends import CpuBackend, make_backend
from tidal.backends import link as L
from tidal.backends.link import LinkEmulation
from tidal.config import OffloadConfig
from tidal.errors import ConfigError

# memory GB/s over achieved PCIe GB/s, from the datasheet figures written out again here
PUBLISHED_RATIOS = {"h100-pcie4": 3350 / 25, "h100-pcie5": 3350 / 50, "h100pcie-pcie4": 2000 / 25,
                    "h100pcie-pcie5": 2000 / 50, "h200-pcie4": 4800 / 25, "h200-pcie5": 4800 / 50,
                    "a100-pcie4": 2039 / 25, "a6000-pcie4": 768 / 25, "rtx5000ada-pcie4": 576 / 25}


def test_targets_are_the_published_ratios():
    assert {name: t.ratio for name, t in L.TARGETS.items()} == PUBLISHED_RATIOS
    assert str(L.target("a6000-pcie4")) == "RTX A6000 on PCIe Gen4 x16"


def test_a_link_like_a_target_gives_a_layer_its_copy_to_decode_ratio():
    # H100 SXM on Gen4: a 100 MB layer decodes in 100e6 / 3350e9 s there and copies in 100e6 / 25e9 s; here
    # it decodes in 5 ms, so its copy must take 134 * 5 ms = 0.67 s: 100e6 / 0.67 bytes per second
    link = LinkEmulation.like("h100-pcie4", layer_bytes=100_000_000, layer_seconds=0.005)
    assert link.gbps == pytest.approx(100e6 / 0.67 / 1e9, rel=1e-12)
    assert link.seconds(100_000_000) == pytest.approx((100e6 / 25e9) / (100e6 / 3350e9) * 0.005, rel=1e-12)
    assert link.derivation == L.LinkDerivation(134.0, 100_000_000, 0.005, "h100-pcie4")
    assert "H100 SXM on PCIe Gen4 x16" in link.label and "134x" in link.label
    d = link.describe()
    assert d["emulated"] is True and d["gbps"] == link.gbps and d["target"] == "h100-pcie4"
    assert (d["ratio"], d["layer_bytes"], d["layer_seconds"]) == (134.0, 100_000_000, 0.005)
    # a ratio given directly; powers of two, so exact: 2**20 bytes / (4 * 2**-10 s) = 2**28 B/s
    exact = LinkEmulation.from_ratio(4, 1 << 20, 2 ** -10)
    assert exact.gbps == 2 ** 28 / 1e9 and exact.derivation.target == ""
    assert LinkEmulation(2.5).describe() == {"emulated": True, "gbps": 2.5, "label": "2.5 GB/s link"}


def test_a_layer_is_its_share_of_the_step_by_bytes():
    # 8 layers of 1 MB and a 2 MB LM head read in 100 ms: a layer's share is 1/10 of it
    assert L.layer_seconds_of_step(0.1, 8, 1_000_000, 2_000_000) == pytest.approx(0.01, rel=1e-15)
    assert L.layer_seconds_of_step(0.5, 4, 1 << 20, 0) == 0.125


@pytest.mark.parametrize("make, says", [
    (lambda: LinkEmulation(0), "link gbps=0"), (lambda: LinkEmulation(-1.0), "link gbps=-1.0"),
    (lambda: LinkEmulation(math.nan), "link gbps=nan"), (lambda: LinkEmulation(math.inf), "link gbps=inf"),
    (lambda: LinkEmulation(True), "link gbps=True"), (lambda: LinkEmulation("2"), "link gbps='2'"),
    (lambda: LinkEmulation(1.0, label=3), "link label=3"),
    (lambda: LinkEmulation.from_ratio(0, 1, 1.0), "ratio=0"),
    (lambda: LinkEmulation.from_ratio(2, 0, 1.0), "layer_bytes=0"),
    (lambda: LinkEmulation.from_ratio(2, 1.5, 1.0), "layer_bytes=1.5"),
    (lambda: LinkEmulation.from_ratio(2, 1, -1.0), "layer_seconds=-1.0"),
    (lambda: LinkEmulation.like("h100", 1, 1.0), "link target 'h100' is unknown; targets: h100-pcie5"),
    (lambda: L.layer_seconds_of_step(0.1, 0, 1, 0), "num_layers=0"),
    (lambda: L.layer_seconds_of_step(0.1, 2, 1, -1), "other_bytes=-1"),
    (lambda: L.parse("fast"), "--link 'fast': neither a bandwidth in GB/s nor a target (h100-pcie5"),
    (lambda: L.parse("0"), "--link '0': a bandwidth must be a finite number of GB/s > 0"),
    (lambda: L.parse("nan"), "--link 'nan'"), (lambda: L.parse("-2"), "--link '-2'"),
    (lambda: L.coerce("h100-pcie4"), "link='h100-pcie4': a target needs this machine's decode time"),
    (lambda: L.coerce(0.0), "link=0.0 must be a LinkEmulation or a bandwidth"),
    (lambda: OffloadConfig(link=[1]), "link=[1] must be"),
    (lambda: OffloadConfig(device="cuda", link=1.0), "device='cuda' has a real one"),
])
def test_bad_values_raise_config_error_naming_them(make, says):
    with pytest.raises(ConfigError) as info:
        make()
    assert says in str(info.value)


def test_parse_and_coerce():
    assert L.parse("2.5") == 2.5 and L.parse("h100-pcie4") is L.TARGETS["h100-pcie4"]
    link = LinkEmulation(1.0)
    assert L.coerce(None) is None and L.coerce(link) is link and L.coerce(3) == LinkEmulation(3.0)
    assert OffloadConfig(link=2).link == LinkEmulation(2.0)


def test_an_emulated_copy_takes_at_least_bytes_over_bandwidth():
    link = LinkEmulation(0.05)  # 50 MB/s: 1 MiB takes at least 21 ms
    backend = make_backend("cpu", link=link)
    try:
        assert isinstance(backend, CpuBackend) and backend.link is link
        src = torch.arange(1 << 18, dtype=torch.float32)  # 1 MiB
        dst = torch.empty_like(src)
        t0 = time.perf_counter()
        transfer = backend.copy([dst], [src])
        transfer.wait()
        wall = time.perf_counter() - t0
        assert torch.equal(dst, src)
        assert transfer.seconds() >= link.seconds(src.nbytes) and wall >= link.seconds(src.nbytes)
    finally:
        backend.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_model("llama", num_layers=4).save_pretrained(path)
    return path


def test_the_engine_copies_through_the_link(checkpoint):
    link = LinkEmulation(0.05)
    assert tidal.Engine.placement(checkpoint, device="cpu", link=link).offload.link is link
    with tidal.Engine.from_pretrained(checkpoint, device="cpu", resident_fraction=0.5, kv_cache_bytes=1 << 16,
                                      link=link) as engine:
        assert engine.backend.link is link
        report = engine.preempt(weights="host", kv="swap")
        assert report.weight_bytes > 0 and report.weight_seconds >= link.seconds(report.weight_bytes)
        engine.resume(pipelined=False)
    with tidal.Engine.from_pretrained(checkpoint, device="cpu", kv_cache_bytes=1 << 16, link=2) as engine:
        assert engine.backend.link == LinkEmulation(2.0)
    with pytest.raises(ConfigError, match="link=-1"):
        tidal.Engine.from_pretrained(checkpoint, device="cpu", link=-1)


def test_offload_streams_through_the_link():
    model = make_model("llama", num_layers=4)
    layer_bytes = sum(p.nbytes for p in model.model.layers[0].parameters())
    link = LinkEmulation(0.05)
    tidal.offload(model, resident_fraction=0.0, device="cpu", link=link, record_timeline=True)
    try:
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
        stats = tidal.stats(model)
        copies = [end - start for kind, _, start, end in stats.timeline if kind == "copy"]
        # every layer streamed (and the next forward's first ones prefetched), each copy one layer
        assert len(copies) >= 4 and stats.last.bytes_streamed == stats.last.copies * layer_bytes
        assert min(copies) >= link.seconds(layer_bytes)
    finally:
        tidal.restore(model)
    with pytest.raises(ConfigError, match="link='h100-pcie4'"):
        tidal.offload(model, device="cpu", link="h100-pcie4")
    assert not tidal.is_offloaded(model)


def test_runtime_load_passes_the_link_to_its_engine(checkpoint):
    link = LinkEmulation(1.5)
    with tidal.Runtime(device="cpu") as rt:
        rt.load("a", checkpoint, kv_cache_bytes=1 << 16, link=link)
        rt.load("b", checkpoint, kv_cache_bytes=1 << 16)
        assert rt.models["a"].backend.link is link and rt.models["b"].backend.link is None

import pytest

from datamodules.registry import Registry
from datamodules.sources import SOURCES, get_source
from lightning_modules.losses import LOSSES, build_loss
from lightning_modules.networks import NETWORKS, build_network


def test_register_lookup_and_errors():
    reg = Registry("widget")

    @reg.register("a")
    def make_a():
        return 1

    assert reg.lookup("a") is make_a and list(reg) == ["a"]
    with pytest.raises(ValueError, match="widget 'a' registered twice"):
        reg.register("a")(lambda: 2)
    with pytest.raises(KeyError, match=r"unknown widget 'b'; registered: \['a'\]"):
        reg.lookup("b")


def test_project_registries_answer_with_known_names():
    assert isinstance(SOURCES, Registry) and isinstance(NETWORKS, Registry) and isinstance(LOSSES, Registry)
    assert get_source("mosmed").name == "mosmed"
    with pytest.raises(KeyError, match=r"unknown source 'medsegx'; registered: \['covid19_20', .*'ctseg', .*'mosmed'.*\]"):
        get_source("medsegx")
    with pytest.raises(KeyError, match="unknown network 'unetx'"):
        build_network("unetx", 3, 1, 4, patch_size=(16, 16, 16), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(KeyError, match="unknown loss 'focalx'"):
        build_loss("focalx")
    net = build_network("unet", 2, 1, 4, patch_size=(16, 16), spacing=(1.0, 1.0), channels=(4, 8), strides=(2,),
                        num_res_units=0)
    import torch
    # dimensionality is a parameter: a 2D network runs slice by slice on the same 3D tensors
    assert net(torch.zeros(1, 1, 16, 16, 3)).shape == (1, 4, 16, 16, 3)

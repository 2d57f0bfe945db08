import pytest

from datamodules.registry import Registry
from datamodules.sources import SOURCES, get_source
from lightning_modules.losses import LOSSES, build_loss
from lightning_modules.networks import NETWORKS, build_network
from tests.args import base_args


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
    net = build_network("unet", 2, 1, 4, patch_size=(16, 16), spacing=(1.0, 1.0),
                        **base_args("networks", "unet", channels=(4, 8), strides=(2,), num_res_units=0))
    import torch
    # dimensionality is a parameter: a 2D network runs slice by slice on the same 3D tensors
    assert net(torch.zeros(1, 1, 16, 16, 3)).shape == (1, 4, 16, 16, 3)


# ------------------------------------------------------------------ params dataclasses and base.yaml

def _registries():
    from lightning_modules.methods import METHODS

    return [NETWORKS, LOSSES, METHODS]


def test_base_yaml_holds_exactly_the_required_fields_of_every_registered_entry():
    """Each default lives in one place: base.yaml has a block per registered name with exactly the fields its
    params dataclass leaves without a default (plus a method's sweep `search`), values of the declared types."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    from datamodules.registry import required_fields
    from experiments.config import CONFIG_DIR

    base = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "base.yaml"))
    for registry in _registries():
        assert set(base[registry.group]) == set(registry) == set(registry.params), registry.group
        for name, block in base[registry.group].items():
            cls = registry.params[name]
            keys = set(block) - ({"search"} if registry.group == "methods" else set())
            assert keys == set(required_fields(cls)), f"{registry.group}.{name}"
            registry.make_params(name, {k: block[k] for k in keys})  # types as declared
            # the optional fields default to None (the library's own default): no number lives in Python
            assert all(f.default is None for f in fields(cls) if f.name not in keys), f"{registry.group}.{name}"


def test_builders_take_exactly_their_params_fields_and_declare_no_defaults():
    """A builder's own keyword default could disagree with base.yaml again; the dataclass is the signature."""
    import inspect
    from dataclasses import fields

    for registry in _registries():
        for name, obj in registry.items():
            if registry is NETWORKS:
                sig = inspect.signature(obj)
                own = [p for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY]
            elif registry is LOSSES:
                own = list(inspect.signature(obj.__init__).parameters.values())[1:]
            else:
                continue  # methods take **params, checked against the dataclass in Method.__init__
            assert {p.name for p in own} == {f.name for f in fields(registry.params[name])}, f"{registry.group}.{name}"
            assert all(p.default is inspect.Parameter.empty for p in own), f"{registry.group}.{name}"


@pytest.mark.parametrize("override, message", [
    ("networks.unet.chanels=[4,8]", r"^networks\.unet\.chanels: network 'unet' has no argument 'chanels'; "
                                    r"its arguments: \['channels', "),
    ("networks.unet.num_res_units=two", r"^networks\.unet\.num_res_units='two': .*Integer \(it takes int\)$"),
    ("networks.unet.channels=4", r"^networks\.unet\.channels=4: needs a list \(list\[int\]\), e\.g\. \[4\]$"),
    ("methods.tent.steps=1.5", r"^methods\.tent\.steps=1\.5: .*Integer"),
    ("losses.focal.alpha=x", r"^losses\.focal\.alpha='x': needs a list"),
    ("networks.unetx.channels=[4]", r"^networks\.unetx: no network of that name; registered: \[.*'unet'"),
])
def test_a_bad_argument_fails_at_load_naming_its_key(override, message):
    from experiments.config import load_config

    with pytest.raises(ValueError, match=message) as e:
        load_config([override])
    assert "\n" not in str(e.value)


def test_optional_network_arguments_are_accepted_and_reach_the_library():
    """A field defaulting to None is the library's default until set: unetr's res_block (MONAI: True)."""
    from experiments.config import load_config, selected_args

    cfg = load_config(["experiment=smoke", "networks.unetr.res_block=false"])
    args = selected_args(cfg, "networks", "unetr")
    assert args["res_block"] is False and "res_block" not in selected_args(load_config(["experiment=smoke"]),
                                                                           "networks", "unetr")
    net = build_network("unetr", 3, 1, 4, (16, 16, 16), (1.0, 1.0, 1.0), **args)
    assert type(net.net.encoder1.layer).__name__ == "UnetBasicBlock"
    net = build_network("unetr", 3, 1, 4, (16, 16, 16), (1.0, 1.0, 1.0), **{**args, "res_block": None})
    assert type(net.net.encoder1.layer).__name__ == "UnetResBlock"

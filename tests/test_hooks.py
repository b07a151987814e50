"""The patched upstream's hook spec: registration checks, keyword calls, and what the step hook sees."""
import pytest
from open_clip_train.plugins import HOOKS, PluginManager

from openclip_robust.plugin import RobustPlugin


class Good:
    def add_args(self, parser):
        parser.seen = True

    def step_inputs(self, args, model, batch, images, texts):
        return {"extra": batch[2]}

    def _helper(self):  # private: not a hook, allowed
        pass


def test_the_project_plugin_passes_the_spec_check():
    PluginManager({"robust": RobustPlugin()})  # raises if a public method is not a hook


def test_unknown_public_method_names_plugin_and_method():
    class Misspelled(Good):
        def on_train_epoch_begin(self, args, model, data, epoch):
            pass

    with pytest.raises(TypeError, match=r"plugin 'mine': 'on_train_epoch_begin' is not a hook"):
        PluginManager({"mine": Misspelled()})


@pytest.mark.parametrize("bad", ["missing", "extra", "renamed"])
def test_wrong_signature_names_plugin_and_hook(bad):
    sigs = {"missing": lambda self, args, model, batch, images: {},
            "extra": lambda self, args, model, batch, images, texts, more: {},
            "renamed": lambda self, args, model, inputs, images, texts: {}}
    plugin = type("P", (), {"step_inputs": sigs[bad]})()
    with pytest.raises(TypeError, match=r"plugin 'p': hook step_inputs.*does not match the spec "
                                        r"step_inputs\(args, batch, images, model, texts\)"):
        PluginManager({"p": plugin})


def test_hooks_are_called_with_keywords_and_results_merged():
    class Other:
        def step_inputs(self, texts, images, batch, model, args):  # any order: keywords only
            return {"other": args}

    m = PluginManager({"a": Good(), "b": Other()})
    assert m.merged("step_inputs", args=1, model=None, batch=(0, 0, "k"), images=0, texts=0) == {"extra": "k",
                                                                                                "other": 1}
    assert m.call("create_loss", args=None) == []  # nobody implements it


def test_a_hook_taking_kwargs_accepts_any_spec_keywords():
    plugin = type("P", (), {"step_inputs": lambda self, args, **rest: rest})()
    assert PluginManager({"p": plugin}).merged("step_inputs", args=0, model=1, batch=2, images=3, texts=4) == {
        "model": 1, "batch": 2, "images": 3, "texts": 4}


def test_spec_lists_every_hook_the_loop_calls():
    import inspect
    import open_clip_train.main as main
    import open_clip_train.params as params
    import open_clip_train.train as train
    src = "".join(inspect.getsource(m) for m in (main, params, train))
    called = {h for h in HOOKS if f'"{h}"' in src or f"plugins.{h}(" in src}
    assert called == set(HOOKS), set(HOOKS) - called

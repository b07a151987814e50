"""The ``open_clip_train.plugins`` entry point: the plugin object for the upstream line installed.

3.x (release 3.3.0, the v3 branch) calls the training loop's hooks (``step_inputs``, ``create_loss``);
main (4.x) builds a training task (``create_task``). Told apart by the hook spec the patched upstream
declares, so each line gets a plugin whose hooks its registration check accepts.
"""
from open_clip_train import plugins


def robust():
    if "create_task" in plugins.HOOKS:
        from openclip_robust.task import RobustTaskPlugin
        return RobustTaskPlugin()
    from openclip_robust.plugin import RobustPlugin
    return RobustPlugin()

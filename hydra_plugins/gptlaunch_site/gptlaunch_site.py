"""Puts the folder named by GPTLAUNCH_SITE_DIR on Hydra's config search path, after configs/, so that
`site=NAME` finds $GPTLAUNCH_SITE_DIR/site/NAME.yaml (docs/sites.md). Hydra's own `hydra.searchpath=[file:///DIR]`
does the same from the command line. Hydra imports every plugin module on every start: keep it light."""

import os
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

SITE_DIR = "GPTLAUNCH_SITE_DIR"


class GptlaunchSiteSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        folder = os.environ.get(SITE_DIR, "").strip()
        if folder:
            search_path.append(provider="gptlaunch-site", path=f"file://{Path(folder).expanduser().resolve()}")

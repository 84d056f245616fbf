"""Configs: YAML with ``_component_`` nodes, command-line overrides, ``instantiate``, ``validate`` and typed settings.

```python
from kdtune.config import parse_recipe_args, read_settings, instantiate, save_config

cfg = parse_recipe_args(argv)                       # --config llama3_2/kd optimizer.lr=1e-3 ...
settings = read_settings(MySettings, cfg)            # unknown/misspelt keys raise ConfigError
optimizer = instantiate(cfg.optimizer, model.parameters())
save_config(cfg, f"{settings.output_dir}/config.yaml")
```
"""

from kdtune.config._args import is_main_process, parse_recipe_args, split_recipe_args
from kdtune.config._catalog import (
    ConfigInfo,
    RecipeInfo,
    config_roots,
    find_config,
    find_recipe,
    list_configs,
    list_recipes,
    recipe_roots,
)
from kdtune.config._diff import ConfigChange, config_diff
from kdtune.config._instantiate import import_component, instantiate, validate
from kdtune.config._loader import check_resolvable, load_config, print_config, save_config, to_yaml
from kdtune.config._overrides import apply_overrides, parse_value
from kdtune.config._settings import SettingInfo, check_settings, describe_settings, read_settings, setting

__all__ = [
    "ConfigChange",
    "ConfigInfo",
    "RecipeInfo",
    "SettingInfo",
    "apply_overrides",
    "check_resolvable",
    "check_settings",
    "config_diff",
    "config_roots",
    "describe_settings",
    "find_config",
    "find_recipe",
    "import_component",
    "instantiate",
    "is_main_process",
    "list_configs",
    "list_recipes",
    "load_config",
    "parse_recipe_args",
    "parse_value",
    "print_config",
    "read_settings",
    "recipe_roots",
    "save_config",
    "setting",
    "split_recipe_args",
    "to_yaml",
    "validate",
]

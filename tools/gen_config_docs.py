"""Write docs/configuration.md from the settings classes.

Usage: python tools/gen_config_docs.py > docs/configuration.md
"""

from importlib import import_module

from pydantic_core import PydanticUndefined

CLASSES = [
    ("common (every service)", "services.common.settings", "CommonSettings"),
    ("gateway", "services.gateway.settings", "GatewaySettings"),
    ("catalog", "services.catalog.settings", "CatalogSettings"),
    ("payment", "services.payment.settings", "PaymentSettings"),
    ("stats", "services.stats.settings", "StatsSettings"),
    ("psp_sandbox", "services.psp_sandbox.settings", "SandboxSettings"),
]
common = import_module("services.common.settings").CommonSettings
print("# Configuration\n")
print("Every setting is an environment variable, `SHOPSTACK_` plus the field name in upper")
print("case, read once and validated at start-up (a bad value stops the process with a clear")
print("message). Secrets are `SecretStr`: never logged, never in error messages. In `dev`")
print("mode (the default under `make run`) missing secrets fall back to documented dev values;")
print("`prod` refuses to start without real ones (≥ 32 bytes; admin password ≥ 12 characters).\n")
for title, mod, name in CLASSES:
    try:
        cls = getattr(import_module(mod), name)
    except (ImportError, AttributeError):
        continue
    own = {
        k: v for k, v in cls.model_fields.items() if cls is common or k not in common.model_fields
    }
    if not own:
        continue
    print(f"## {title}\n")
    print("| variable | default | meaning |")
    print("|---|---|---|")
    for field, info in own.items():
        default = info.default
        if default is PydanticUndefined:
            default = info.default_factory() if info.default_factory else "(required)"
        if hasattr(default, "value"):
            default = default.value
        if default is None:
            default = "(unset)"
        desc = (info.description or "").replace("|", "\\|")
        print(f"| `SHOPSTACK_{field.upper()}` | `{default}` | {desc} |")
    print()

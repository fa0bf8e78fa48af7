"""The export format names (kept light: the config check imports this without the export's machinery)."""

GGUF_OUTTYPES = {"gguf_f16": "f16", "gguf_q8_0": "q8_0", "gguf_q4_k_m": "q4_k_m"}
FORMATS = ("merged", *GGUF_OUTTYPES)
DEFAULT_FORMATS = ("merged", "gguf_q8_0")


def format_errors(formats) -> list:
    formats = list(formats or [])
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        return [f"export.formats has unknown format(s) {', '.join(map(repr, unknown))}; the formats are "
                f"{', '.join(FORMATS)}"]
    if not formats:
        return [f"export.formats is empty; pick from {', '.join(FORMATS)}"]
    return []

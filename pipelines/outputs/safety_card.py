"""The dataset card's "Safety and opt-outs" section, from the `safety` entry of stats.json and the counts of the
safety stages (pipelines/safety/stages.py). Outputs written before the safety stage existed get a section
saying that nothing was checked."""

from __future__ import annotations

from mmcorpus.filters.reasons import REASONS

SAFETY_STAGES = ("opt_out", "safety", "safety_images", "nsfw", "nsfw_images")
SAFETY_REASONS = ("opt_out_noai", "opt_out_noimageai", "opt_out_list", "image_opt_out", "blocklist",
                  "flagged_image_words", "nsfw_image", "nsfw_document", "pii_found")


def safety_section(stats: dict, table) -> list[str]:
    """Markdown lines; `table(header, rows)` is the card's table writer."""
    lines = ["## Safety and opt-outs", ""]
    safety = stats.get("safety")
    if not isinstance(safety, dict):
        return lines + ["This output was written without a safety stage: no opt-outs (noai/noimageai, opt-out "
                        "lists), blocklists, NSFW classifier or PII masking were applied.", ""]
    applied = []
    if safety.get("applies_to"):
        applied.append(f"checks applied to {safety['applies_to']} only")
    if safety.get("page_directives"):
        applied.append("page directives honoured: " + ", ".join(f"`{d}`" for d in safety["page_directives"])
                       + " in `<meta name=robots|ai|*bot>` and the page's `X-Robots-Tag` header (`noai` drops "
                       "the document, `noimageai` its images)")
    for key, what in (("opt_out_lists", "opt-out list"), ("blocklists", "blocklist")):
        for lst in safety.get(key) or []:
            applied.append(f"{what} `{lst['path']}`: {lst['entries']:,} entries ({lst['domains']:,} domains, "
                           f"{lst['url_prefixes']:,} URL prefixes), sha256 `{lst['sha256'][:16]}…`, on page and "
                           "image URLs, subdomains included")
    if safety.get("flagged_image_words"):
        applied.append("flagged words in image URLs and alt texts / captions")
    pii = safety.get("pii")
    if pii in ("mask", "reject"):
        applied.append("e-mail addresses, IP addresses and phone numbers in texts "
                       + ("replaced by `[EMAIL]`, `[IP_ADDRESS]`, `[PHONE]`" if pii == "mask"
                          else "rejected (the item is dropped)"))
    nsfw = safety.get("nsfw")
    if isinstance(nsfw, dict):
        clip = f", CLIP `{nsfw['clip_model']}` weights `{nsfw.get('clip_weights')}`" if nsfw.get("clip_model") else ""
        document = (f"; documents with an image above {nsfw['document_threshold']} dropped whole"
                    if nsfw.get("document_threshold") is not None else "")
        applied.append(f"NSFW head over the CLIP image embedding (weights `{nsfw.get('weights')}`{clip}): images "
                       f"scoring above {nsfw.get('image_threshold')} dropped ({nsfw.get('policy', 'drop image')})"
                       f"{document}; the score is kept per image (`nsfw_score`)")
    lines += ["Applied:", ""] + [f"- {a}" for a in applied] + [""]
    rows = []
    for s in stats.get("stages", []):
        for reason, n in sorted(s["reasons"].items(), key=lambda kv: -kv[1]):  # a safety reason in any stage
            if s["stage"] in SAFETY_STAGES or reason in SAFETY_REASONS:
                rows.append([f"`{s['stage']}`", f"`{reason}`", n, REASONS.get(reason, "")])
        for metric, n in sorted((s.get("counters") or {}).items()):
            if metric.startswith(("pii_masked_", "documents_pii_masked")):
                rows.append([f"`{s['stage']}`", f"{metric} (masked, kept)", n, ""])
    if rows:
        lines += table(["stage", "decision", "count", "meaning"], rows) + [""]
    else:
        lines += ["No item was dropped or masked by these checks.", ""]
    not_checked = safety.get("not_checked") or []
    if not_checked:
        lines += ["NOT checked:", ""] + [f"- {n}" for n in not_checked] + [""]
    return lines

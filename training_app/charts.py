"""Server-side SVG pictures for dataset pages: plain markup, no script and no outside files."""

from __future__ import annotations

import logging

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe
from django.utils.translation import gettext as _

logger = logging.getLogger(__name__)

# Size of the picture and of the margins around the plot, in SVG user units (pixels).
WIDTH = 640
HEIGHT = 220
LEFT = 56
RIGHT = 12
TOP = 12
BOTTOM = 44


def length_histogram_svg(histogram: dict) -> SafeString:
    """Return an SVG bar chart of examples per length in tokens, or "" without data.

    `histogram` is Dataset.length_histogram: {"bin_width": w, "counts": [...]}, where bar i
    counts examples of w*i to w*(i+1)-1 tokens. Each bar has a tooltip with its range and count.
    """
    counts: list[int] = list(histogram.get("counts") or [])
    bin_width = int(histogram.get("bin_width") or 1)
    if not counts or max(counts) == 0:
        return mark_safe("")

    plot_width = WIDTH - LEFT - RIGHT
    plot_height = HEIGHT - TOP - BOTTOM
    bar_width = plot_width / len(counts)
    peak = max(counts)
    bottom = TOP + plot_height

    bars = []
    for index, count in enumerate(counts):
        height = plot_height * count / peak
        low, high = index * bin_width, (index + 1) * bin_width - 1
        tooltip = _("%(low)s–%(high)s tokens: %(count)s examples") % {"low": low, "high": high, "count": count}
        bars.append(
            (
                f"{LEFT + index * bar_width:.1f}",
                f"{bottom - height:.1f}",
                f"{max(bar_width - 1, 0.5):.1f}",
                f"{height:.1f}",
                tooltip,
            )
        )
    bar_markup = format_html_join(
        "", '<rect x="{}" y="{}" width="{}" height="{}" fill="#4a78b5"><title>{}</title></rect>', bars
    )

    longest = len(counts) * bin_width - 1
    x_ticks = format_html_join(
        "",
        '<text x="{}" y="{}" text-anchor="middle">{}</text>',
        [
            (f"{LEFT + plot_width * fraction:.1f}", bottom + 16, round(longest * fraction))
            for fraction in (0.0, 0.25, 0.5, 0.75, 1.0)
        ],
    )

    title = _("Examples by length in GPT-2 tokens")
    return format_html(
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
        'style="max-width:{width}px" role="img" aria-label="{title}" font-size="11" '
        'font-family="sans-serif" fill="#333"><title>{title}</title>{bars}'
        '<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>'
        '<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#333"/>'
        "{x_ticks}"
        '<text x="{y_label_x}" y="{top_text}" text-anchor="end">{peak}</text>'
        '<text x="{y_label_x}" y="{bottom}" text-anchor="end">0</text>'
        '<text x="{middle}" y="{x_title_y}" text-anchor="middle">{x_title}</text>'
        '<text x="12" y="{y_title_y}" text-anchor="middle" transform="rotate(-90 12 {y_title_y})">{y_title}</text>'
        "</svg>",
        width=WIDTH,
        height=HEIGHT,
        title=title,
        bars=bar_markup,
        left=LEFT,
        right=LEFT + plot_width,
        top=TOP,
        bottom=bottom,
        x_ticks=x_ticks,
        y_label_x=LEFT - 6,
        top_text=TOP + 8,
        peak=peak,
        middle=LEFT + plot_width / 2,
        x_title_y=HEIGHT - 6,
        x_title=_("Tokens per example"),
        y_title_y=TOP + plot_height / 2,
        y_title=_("Examples"),
    )

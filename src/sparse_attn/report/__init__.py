"""The report floor (beside cli/): pages made from result files, using nothing but their JSON.

* `page`: the one-page report of a results folder (`sparse-attn report`): `write_report`,
  `report_markdown`; the Evaluation section from the evaluation registry;
* `tables`: the README's benchmark tables (`benchmarks/tables.py`) and the GPU picture;
* `html`: the page as one self-contained HTML file (the `report` extra: markdown);
* `text`: Markdown pieces they share (links, pictures, cells, the generic block).
"""

from .page import DEFAULT_TITLE, Blocks, evaluation_section, report_markdown, write_report
from .tables import (GPU_METHODS, GPU_PLOT, block_topk_gpu_table, cpu_table, decode_table, fidelity_table,
                     gpu_files, gpu_phase_table, gpu_plot, gpu_table, layout_table, load_gpu, mechanisms_table,
                     padded_gpu_table, peers_table, render, train_compare_table)
from .text import anchor, generic_summary, relative_prefix
from .html import markdown_to_html

__all__ = ["DEFAULT_TITLE", "GPU_METHODS", "GPU_PLOT", "Blocks", "anchor", "block_topk_gpu_table", "cpu_table",
           "decode_table", "evaluation_section", "fidelity_table", "generic_summary", "gpu_files", "gpu_phase_table",
           "gpu_plot", "gpu_table", "layout_table", "load_gpu", "markdown_to_html", "mechanisms_table",
           "padded_gpu_table", "peers_table", "relative_prefix", "render", "report_markdown", "train_compare_table",
           "write_report"]

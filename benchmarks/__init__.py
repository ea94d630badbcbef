"""deltadiff.benchmarks: latency harness (``dd-run bench``), the end-to-end CLI timing
(``dd-run bench-cli``), MAC counter, reports, and the torch-free quality evaluator
(PSNR-Y / SSIM-Y / LPIPS). One-off measurement scripts live in the repository's ``tools/``."""

__all__ = ["harness", "quality", "lpips", "report", "flops"]

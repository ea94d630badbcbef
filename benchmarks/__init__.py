"""deltadiff.benchmarks: latency harness (``dd-run bench``), MAC counter, reports, and the
torch-free quality evaluator (PSNR-Y / SSIM-Y / LPIPS)."""

__all__ = ["harness", "quality", "lpips", "report", "flops"]

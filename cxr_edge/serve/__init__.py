"""Screening service: FastAPI app with dynamic micro-batching, Prometheus metrics and a kiosk page."""

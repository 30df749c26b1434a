"""One router per resource: caption, vqa, health (health/ready/metrics/models), page."""

"""Pipeline stages: loops, resume, progress around the math core."""

"""Thin front ends that turn platform events into core requests and render replies back."""

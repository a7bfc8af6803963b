"""Hydra configs shipped as package data (resolved by sdediff.cli)."""

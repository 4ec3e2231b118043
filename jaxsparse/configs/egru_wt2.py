"""EGRU language model on wikitext-2: the EvNN reference recipe, or `:cpu` for the CPU-scale variant."""

from jaxsparse.configs.common import get_lm_config


def get_config(variant=None):
  return get_lm_config("egru", "wikitext-2", variant)

from lib.configs.promptnucseg import PromptNucSegConfig

__all__ = ["PromptNucSegConfig"]

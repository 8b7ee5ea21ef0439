from lib.infers.promptnucseg import PromptNucSegClickInfer, PromptNucSegInfer

__all__ = ["PromptNucSegInfer", "PromptNucSegClickInfer"]

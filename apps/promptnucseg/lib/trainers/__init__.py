from lib.trainers.promptnucseg import PromptNucSegTrain

__all__ = ["PromptNucSegTrain"]

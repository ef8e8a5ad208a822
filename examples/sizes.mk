# SIZE (micro | small | gpu) -> gen-data's world size and the embedded base's preset; included by the
# examples' Makefiles.
WORLD_SIZE_micro := tiny
WORLD_SIZE_small := small
WORLD_SIZE_gpu := gpu
TINY_PRESET_micro := micro
TINY_PRESET_small := tiny
TINY_PRESET_gpu := small
ifeq ($(WORLD_SIZE_$(SIZE)),)
$(error SIZE must be micro, small or gpu, not '$(SIZE)')
endif

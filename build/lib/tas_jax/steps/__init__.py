"""The jitted steps and what they are built from: the training step of a concrete network and TAS's search step.

Each step is one pure function of its state, compiled once ahead of the
loop; the programs above drive them.
"""

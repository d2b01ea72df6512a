"""Memory formulas: what the planner predicts with; nothing here touches a live module.

engine.memory.weights   weight bytes per quantisation mode, exact from shapes on the meta device (and
                        actual_weight_bytes, the check of those figures against a loaded module)
"""

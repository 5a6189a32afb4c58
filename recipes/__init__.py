"""Built-in recipes, installed as the data package `onnxq.recipes`; `onnxq run M --recipe int8` finds them."""

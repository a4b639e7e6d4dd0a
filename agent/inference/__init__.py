"""Models and inference: the verified model store and the engine that runs them."""

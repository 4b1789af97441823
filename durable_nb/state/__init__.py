"""What a step's state is: the variables it changed, references to live objects, the pickle
stream that encodes them, process-wide settings, and the digests that compare them."""

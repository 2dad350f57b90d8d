"""Device hardware profiles (Raspberry Pi, Jetson, laptop) used to emulate a heterogeneous fleet."""

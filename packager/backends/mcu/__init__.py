"""The mcu device class: a TensorFlow Lite Micro C-array project for microcontrollers."""

"""Weight number formats: how real weights map to integer codes and back."""

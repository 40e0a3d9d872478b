"""Clinic data in: DICOM CT series, RTSTRUCT/SEG/label maps, preprocessing, import, inspection."""

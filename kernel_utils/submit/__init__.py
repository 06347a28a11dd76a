"""Test inference, the submission writer, and which test studies can be predicted."""

"""The machine's HTTP ceiling: a bare granian hello app measured with the scenarios' load shapes."""
